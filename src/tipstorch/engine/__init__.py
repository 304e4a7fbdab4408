"""The data engine of the paper (Sec. 3.1, A.3): embedding-based curation of a web pool toward target
datasets, near-duplicate removal, and synthetic captions from an image-to-text model.

Layering: engine imports models and data, never train / eval / cli.
"""
