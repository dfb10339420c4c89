"""Hugging Face folders as users have them: a trained tiny model saved with ``save_pretrained``
plus a tokenizer and its declarations, loaded through lmforge's production path
(``lmforge.load``, ``lmforge generate``) and compared with transformers on the same folder:
logits (atol 1e-4), prompt ids and greedy tokens.

- a GPT-2 folder whose tokenizer declares BOS = EOS = ``<eos>`` (no name lmforge guesses as a
  BOS) generates, from a prompt and from nothing;
- Llama's ``attention_bias`` and ``mlp_bias`` are independent (transformers' defaults: false),
  and the export of each combination reloads in transformers with equal logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmforge.checkpoint.load import load
from lmforge.cli import main
from lmforge.data.chat_template import ChatFormat
from lmforge.data.tokenizer import SpecialTokens, special_tokens
from lmforge.generate import generate_tokens
from lmforge.interop.hf import export_hf

transformers = pytest.importorskip(
    "transformers", reason="parity tests compare against transformers (the dev extra)"
)

ATOL = 1e-4
DOCS = [
    "the cat sat on the mat and the dog sat on the log",
    "a bird sang in the tree while the sun rose over the hill",
    "we count one two three four five six seven eight nine ten",
    "red green blue and yellow are the colours of the kite",
]
PROMPT = "the cat sat on"


def byte_bpe(specials: list[str], bos_template: str | None = None) -> Tokenizer:
    """A byte-level BPE trained on DOCS; ``bos_template`` makes encoding prepend that token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DOCS * 5, trainer)
    if bos_template:
        bos = (bos_template, tok.token_to_id(bos_template))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_template} $A", special_tokens=[bos]
        )
    return tok


def trained(hf_cfg: Any, tok: Tokenizer, eos: int, steps: int = 40) -> Any:
    """A seeded transformers model trained ``steps`` AdamW steps on DOCS (each ends with EOS),
    so biases leave zero and greedy output is text, not one repeated token."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    docs = [tok.encode(d).ids + [eos] for d in DOCS]
    # rows of documents in rotated orders: after an EOS the model learns to start a document
    ids = torch.tensor([sum(docs[k:] + docs[:k], []) for k in range(len(docs))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_folder(model: Any, tok: Tokenizer, folder: Path, declares: dict[str, str]) -> None:
    """save_pretrained + tokenizer.json + the declarations transformers reads."""
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(declares))
    special = {k: v for k, v in declares.items() if k.endswith("_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def compare(folder: Path, ref: Any, prompt: str, new: int = 12) -> list[int]:
    """lmforge (production loader) vs transformers on ``folder``: logits, prompt ids, greedy."""
    ours, tok, ckpt = load(folder, torch.device("cpu"), expect="decoder")
    ckpt = ckpt.path
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = hf_tok(prompt)["input_ids"]
    assert tok.encode(prompt).ids == ids  # BOS added (or not) as transformers adds it
    x = torch.tensor([ids + ids[::-1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, rtol=0, atol=ATOL)
    stop = ChatFormat.for_checkpoint(ckpt, tok).stop_ids(ckpt)
    mine = list(generate_tokens(ours, ids, max_new_tokens=new, temperature=0, eos_id=stop))
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)
    theirs = [t for t in out[0, len(ids) :].tolist() if t not in stop]  # HF keeps the EOS
    assert mine == theirs and len(mine) >= 3, (mine, theirs)
    return mine


def test_gpt2_folder_declaring_eos_as_bos_generates_like_transformers(
    tmp_path: Path, capsys
) -> None:
    tok = byte_bpe(["<eos>", "<pad>"])
    eos = tok.token_to_id("<eos>")
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tok.token_to_id("<pad>"),
    )  # fmt: skip
    ref = trained(cfg, tok, eos)
    declares = dict(tokenizer_class="GPT2Tokenizer", bos_token="<eos>", eos_token="<eos>")
    save_folder(ref, tok, tmp_path, declares | dict(pad_token="<pad>"))
    assert json.loads((tmp_path / "generation_config.json").read_text())["bos_token_id"] == eos
    mine = compare(tmp_path, ref, PROMPT)

    _, ours_tok, _ = load(tmp_path, torch.device("cpu"), expect="decoder")
    assert special_tokens(ours_tok) == SpecialTokens(bos=eos, eos=eos, pad=eos + 1)
    # the CLI: from a prompt (needs no BOS) and from nothing (starts at the declared BOS)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for prompt in (PROMPT, ""):
        out = tmp_path / f"gen-{len(prompt)}"
        flags = ["--temperature=0", "--max_new_tokens=12", f"--out_dir={out}"]
        args = ["generate", f"--checkpoint={tmp_path}", f"--prompt={prompt}", *flags]
        assert main(args) == 0, capsys.readouterr().err
        text = json.loads((out / "generation.json").read_text())["text"]
        start = hf_tok(prompt)["input_ids"] if prompt else [eos]  # HF: bos_token_id when empty
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([start]), max_new_tokens=12, do_sample=False)
        expected = hf_tok.decode(theirs[0, len(start) :], skip_special_tokens=True)
        assert text == expected and text.strip()
    assert text != hf_tok.decode(mine)  # the empty prompt really started elsewhere


LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.mark.parametrize("attention_bias,mlp_bias", [(True, False), (False, True), (True, True)])
def test_llama_attention_and_mlp_biases_are_independent(
    attention_bias: bool, mlp_bias: bool, tmp_path: Path
) -> None:
    tok = byte_bpe(["<s>", "</s>"], bos_template="<s>")
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), attention_bias=attention_bias, mlp_bias=mlp_bias,
        bos_token_id=bos, eos_token_id=eos, **LLAMA,
    )  # fmt: skip
    ref = trained(cfg, tok, eos)
    biases = [n for n, _ in ref.named_parameters() if n.endswith("bias")]
    assert any("self_attn.o_proj" in n for n in biases) is attention_bias
    assert any("mlp.down_proj" in n for n in biases) is mlp_bias
    declares = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>")
    save_folder(ref, tok, tmp_path / "hf", declares)
    compare(tmp_path / "hf", ref, PROMPT)

    # export: transformers reloads the same combination with equal logits
    ours, ours_tok, _ = load(tmp_path / "hf", torch.device("cpu"), expect="decoder")
    assert (ours.cfg.bias, ours.cfg.qkv_bias, ours.cfg.mlp_bias) == (
        attention_bias,
        attention_bias,
        mlp_bias,
    )
    out = export_hf(ours, ours_tok, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert (written["attention_bias"], written["mlp_bias"]) == (attention_bias, mlp_bias)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([tok.encode(" ".join(DOCS)).ids[:60]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x), rtol=0, atol=ATOL)
