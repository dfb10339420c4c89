"""Looking into runs and models: the training doctor (``doctor.py``)."""
