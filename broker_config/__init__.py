"""The contract between the cloud gateway and the GPU workers: topology, users, wire schemas."""
