"""What the tests share, importable from every test folder (pytest puts `tests/` on the path: see
`pythonpath` in pyproject.toml).

- `support.models`: tiny in-memory models (Llama, GPT-2, BERT, a conv net), parameter randomisers,
  model snapshots and a one-layer holder for layer tests.
- `support.files`: a tiny trained tokenizer, tiny models saved as pretrained folders, token rows, and a
  collator that interrupts training.
- `support.serving`: a tiny model with three adapters on disk, reference generations and a live server.
"""
