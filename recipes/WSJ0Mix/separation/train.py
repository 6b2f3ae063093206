#!/usr/bin/env python3
"""Speech separation on WSJ0-2mix / WSJ0-3mix.

    python train.py hparams/dpmamba_m.yaml --data_folder /path/to/wsj0-mix --dm_folder /path/to/wsj0/si_tr_s

Without --data_folder it trains on the embedded demo corpus. Everything else
(data preparation, dynamic mixing, the Brain) lives in speechbrain_mamba.separation.
"""

from speechbrain_mamba.separation.recipe import main

if __name__ == "__main__":
    main()
