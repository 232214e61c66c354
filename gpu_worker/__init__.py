"""The GPU worker: pulls requests for one model from RabbitMQ and runs them on vLLM in-process."""
