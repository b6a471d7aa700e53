import sys

from lyra_pl.data.corpus.build import main

sys.exit(main())
