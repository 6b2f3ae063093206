#!/usr/bin/env python3
"""Speech separation on Libri2Mix / Libri3Mix (clean or noisy).

    python train.py hparams/dpmamba_m.yaml --data_folder /path/to/Libri2Mix \
        --dm_folder /path/to/LibriSpeech-8k/train-clean-360 [--condition noisy]

``--num_spks 3`` with ``--data_folder /path/to/Libri3Mix`` for three speakers.
``condition: clean`` reads ``mix_clean``; ``noisy`` reads ``mix_both`` and
dynamic mixing adds the noise recordings listed in the training CSV. Without
--data_folder it trains on the embedded demo corpus. Everything else (data
preparation, dynamic mixing, the Brain) lives in speechbrain_mamba.separation.
"""

from speechbrain_mamba.separation.recipe import main

if __name__ == "__main__":
    main()
