"""The cloud-side gateway: OpenAI-compatible API in front of the cluster's broker."""
