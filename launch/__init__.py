"""Launchers: TPU VM pod slices (tpu_vm), GKE (gke), GCP Batch (gcp_batch), SLURM (slurm). See README.md."""
