"""Other formats in and out: Hugging Face folders (decoder, BERT key maps), GGUF files."""
