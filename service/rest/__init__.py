"""HTTP routes: the V2 inference protocol (``v2``) and the admin API (``admin``)."""
