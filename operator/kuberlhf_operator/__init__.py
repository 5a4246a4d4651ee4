"""The kopf operator: RLHFJob -> KubeRay RayJob, with live status.

Imports only kopf, kubernetes and the API models: its image carries nothing else,
and nothing here imports the training program (kuberlhf_workers).
"""
