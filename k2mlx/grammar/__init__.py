"""Constrained decoding (issue 15): JSON answers that follow a schema and tool calls to declared
tools with schema-valid arguments, enforced while decoding through llguidance.

- `spec.py`: the reply's shape as a Lark grammar (pure Python);
- `compile.py`: llguidance tokenizer adapter, cached and time-bounded grammar compilation, 400s
  naming the schema keyword;
- `plan.py`: which requests are constrained and how (`constraint_for`, called by `Engine.prepare`);
- `processor.py`: the per-sequence mask, an mlx-lm logits processor (imports MLX).
The package imports nothing heavy until a request is constrained."""
