"""NKI kernels (they import the ``nki`` package, so import these modules only where it exists, or under the
test emulator). ``selective_scan``: scan forward / backward and the decoding state update;
``attention``: B'MOJO attention forward / backward; ``_common``: on-chip constant matrices and loads."""
