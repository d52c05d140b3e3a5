"""The built-in shapes world's generators that go beyond the MMEB-style tasks of
:mod:`rematch.data.shapes_tasks`: today, the generative pre-training corpus."""
