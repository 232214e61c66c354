"""Running the whole stack on one machine: the one home of the dev and test harness.

``chatai dev``, ``chatai bench`` and the test suite start their parts from here: a private
RabbitMQ node (``broker_node``), a private PostgreSQL cluster (``postgres_node``, for replicas
sharing state), a private sshd with the real circuit breaker (``sshd``), a
private Slurm (``slurm_cluster``, ``dev_slurm``), the tiny test model (``tiny_model``), child
processes started and waited for (``processes``) and the whole stack (``stack``). Nothing in
``gateway/``, ``gpu_worker/``, ``broker_config/``, ``slurm_jobs/`` or ``circuit_breaker/``
imports this package: production code never depends on its harness.
"""
