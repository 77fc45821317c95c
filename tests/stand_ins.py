"""Stand-ins the tests share."""

from randose_jax.inference import predictor as predictor_lib


class FunctionPredictor(predictor_lib.Predictor):
  """A `Predictor` whose network is `fn(example) -> (D, H, W)` prediction
  in target units: encoding, windows and decoding are the Predictor's own.
  `calls` records the input shapes of each `predict_local` call."""

  def __init__(self, data_config, fn):
    super().__init__(
        model=None,
        params=None,
        data_config=data_config,
        mesh=None,
        forward=lambda *args: None,
    )
    object.__setattr__(self, "fn", fn)
    object.__setattr__(self, "calls", [])

  def predict_local(self, examples, tta=False):
    del tta
    self.calls.append([e["ptv"].shape for e in examples])
    return [self.fn(e) for e in examples]
