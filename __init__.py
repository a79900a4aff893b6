"""megaclass: pretrain retrieval encoders on clustered pseudo-classes (Unicom / MLCD).

Library code lives in the subpackages (``megaclass.data``, ``megaclass.clustering``,
``megaclass.training``); ``megaclass.pipelines`` holds the stages, the CLI and reports.
Nothing heavy is imported here so that ``import megaclass`` stays cheap.
"""

__version__ = "0.1.0"
