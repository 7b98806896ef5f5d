"""agentguard: cost control for agentic and RAG workflows (placeholder, filled in below)."""
