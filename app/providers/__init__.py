"""Model providers behind one streaming interface (base.py): the built-in offline `echo`, and
Anthropic and OpenAI through their official SDKs."""
