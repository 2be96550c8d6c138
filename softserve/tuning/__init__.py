"""Prompt tuning on the resident frozen model: data, init, trainer, PEFT export, jobs, CLI.

Only the soft prompt P [num_virtual_tokens, hidden] is learned; the model's weights are never
modified. See trainer.py for how training shares the model with the serving engine.
"""
