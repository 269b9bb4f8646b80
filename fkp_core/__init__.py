"""fkp_core: facial keypoints (iBUG-68) for images and video; a plain library (no Ray, no jobs).

Modules, one concept each: constants, dataset, transforms, model, weights, detector, landmarks,
metrics, viz, training, video, tables, filters, tracking, smoothing, pose.
"""

__version__ = "0.1.0"
