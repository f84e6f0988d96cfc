"""Benchmarks of loratree against PEFT on the embedded SmolLM2 model (``make bench``).

``harness`` times callables interleaved in one process; ``models`` builds the base and the
adapted copies with identical LoRA weights; ``lora_rows`` measures each row; ``report``
renders markdown; ``run`` is the command line.
"""

__all__: list[str] = []
