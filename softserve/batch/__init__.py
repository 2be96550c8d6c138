"""The OpenAI Batch API's work: input lines, their durable progress in the store, and the runner that
feeds them to the engine as background rows (docs/batch.md)."""
