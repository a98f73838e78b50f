"""Graph rewrites. Each module holds one pass: `run(gm, ctx) -> gm` with a docstring that
says what it expects and guarantees. The order lives in compiler/pipeline.py."""
