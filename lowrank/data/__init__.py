"""Package data: the embedded model ``induction-2l`` and the script that trains it.

Load it with ``lowrank.models.load_pretrained()``; rebuild it with
``python -m lowrank.data.train_embedded --out DIR`` (see ``induction-2l/README.md``).
"""
