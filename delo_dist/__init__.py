"""delo-dist: distributed continual missing-modality learning (DeLo and baselines).

`delo_dist.load(folder)` returns a trained model ready to predict (delo_dist/inference.py);
importing the package itself imports nothing heavy.
"""


def load(path, **options):
    """A trained model from a training checkpoint, a run folder or an export folder:
    `delo_dist.load("outputs/quickstart").predict(images=[...], texts=[...])`.
    Options and outputs: delo_dist.inference.load and InferenceModel.predict."""
    from delo_dist.inference import load as _load
    return _load(path, **options)
