"""The built-in shapes world, whole: the project's own data, generated offline.

:mod:`~rematch.world.scenes` (scenes, rendering, captions), :mod:`~rematch.world.tasks`
(the five MMEB-style shapes subsets and ``rematch data synth``, which declares them in the
root's ``manifest.json``), :mod:`~rematch.world.pretrain_corpus` (the pre-training corpus),
:mod:`~rematch.world.video_clips` and :mod:`~rematch.world.pages` (MMEB-V2-style video and
visual-document tasks). The readers in :mod:`rematch.data` never import this package: a world
root describes itself through its manifest, like any other data folder.
"""
