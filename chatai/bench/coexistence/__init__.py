"""``chatai bench coexistence``: do inference workers live in a cluster's idle gaps without
delaying anyone? One seeded regular workload runs twice on an emulated 8-GPU Slurm cluster,
alone and with autoscaled workers in a preemptible scavenger partition; the measures compare
the two runs. See docs/coexistence.md.
"""
