"""Pictures of a trained model: Grad-CAM grids of its mistakes (`viz.gradcam`) and training curves (`viz.plots`)."""
