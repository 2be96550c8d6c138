"""The product without HTTP: the runtime, generation, prompt and tuning operations for a principal,
tenancy, API keys, rate limits and typed errors. softserve/api is one way in; nothing here imports it."""
