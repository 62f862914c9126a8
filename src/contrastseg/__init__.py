"""contrastseg: semantic segmentation with cross-image pixel contrast.

The public API, used the same way by the command line and by notebooks::

    from contrastseg import load_config, train, evaluate_checkpoint, predict
    cfg = load_config("configs/demo.yaml", ["train.iters=200"])
    result = train(cfg)
    evaluate_checkpoint(cfg, result.run_dir / "checkpoints" / "iter_0000200.pt")

Names are imported on first use, so ``import contrastseg`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "ExperimentConfig": "contrastseg.config",
    "load_config": "contrastseg.config",
    "show_config": "contrastseg.config",
    "Trainer": "contrastseg.engine.trainer",
    "TrainResult": "contrastseg.engine.trainer",
    "train": "contrastseg.workflow",
    "evaluate_checkpoint": "contrastseg.engine.inference",
    "load_trained_model": "contrastseg.engine.inference",
    "predict": "contrastseg.engine.inference",
    "export_checkpoint": "contrastseg.export",
    "load_exported_program": "contrastseg.export",
    "predict_onnx": "contrastseg.onnx_predict",
    "save_pretrained": "contrastseg.hub",
    "from_pretrained": "contrastseg.hub",
    "PretrainedModel": "contrastseg.hub",
    "PixelContrast": "contrastseg.contrast",
    "PrototypeClassifier": "contrastseg.prototype",
    "Segmentor": "contrastseg.models",
    "build_model": "contrastseg.models",
    "ContrastSegError": "contrastseg.errors",
    "ConfigError": "contrastseg.errors",
    "DataError": "contrastseg.errors",
    "CheckpointError": "contrastseg.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'contrastseg' has no attribute {name!r}")
