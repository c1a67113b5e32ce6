"""The background worker: ``python -m JointRegSegLib.worker JOB.json`` (DESIGN.md, "The worker contract")."""
