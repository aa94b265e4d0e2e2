"""The stages that build the embedded toy model (`builtin:toy`); tools/toy_world.py is their command line.

models.py           the SD 1.x classes at toy sizes, the fp16 parts folder, small shared helpers
storage.py          every file the stages write (atomic, through library.files); states in shards
scorer_stage.py     stage 1: the scorer CNN (library.toy.ShapeClassifier)
vae_stage.py        stage 2: the VAE and its latent re-scaling; the decoder fine-tune
diffusion_stage.py  stage 3: UNet + text encoder trained together on a bank of encoded pictures; snapshots
export.py           stage 4: the EMA model as fp16 parts; parts -> the committed single file (`assemble`)
train.py            the `train` command (every stage, resumable) and `collect`
evaluation.py       sample accuracy judged by the scorer, the samples figure, likeness of a TI run
pictures.py         a Kohya folder of one concept; the grid of a TI run's previews
"""

import library  # noqa: F401  (first: it settles how the dependencies behave)
