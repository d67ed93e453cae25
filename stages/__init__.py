"""The pipeline's stages as functions: a typed config in, a result out. The root scripts are thin
command lines over them; ``demo.py``, the tools and the tests call them directly (one code path).

    dataset       prepare_dataset      validate a paired folder, masks, masked copies, the split
                                       (after writing phantoms or CT projections)   dataSegmentation.py
    train_vqgan   train_vqgan          stage 1, the ML-VQGAN -> run folder           vq-gan_train.py
    reconstruct   reconstruct_images   stage 1 evaluation -> summary                 vq-gan_eval.py
    train_ldm     train_ldm            stage 2, diffusion or distillation -> run folder   ldm_train.py
    suppress      suppress_images      bone suppression of a split or folder (sharding, DICOM
                                       output) -> summary; eval_config                ldm_eval.py
    convert       convert_published, export_run   the published weights, a release   convert_reference.py

Each module also holds its script's parser (``build_parser``, ``config_for``), so the command line
can be tested without running a script. The modules are imported one by one (this file imports
nothing), so a script loads only its own stage.
"""
