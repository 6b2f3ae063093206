#!/usr/bin/env python3
"""Speech separation on WHAM! (WSJ0-2mix with background noise, 2 speakers).

    python train.py hparams/dpmamba_m.yaml --data_folder /path/to/wham_original \
        --dm_folder /path/to/wsj0/si_tr_s

The mixtures are ``mix_both`` (speech + noise), the targets the clean sources;
dynamic mixing adds the noise recordings listed in the training CSV. Without
--data_folder it trains on the embedded demo corpus. Everything else (data
preparation, dynamic mixing, the Brain) lives in speechbrain_mamba.separation.
"""

from speechbrain_mamba.separation.recipe import main

if __name__ == "__main__":
    main()
