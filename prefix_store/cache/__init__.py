"""The device cache: which prefixes are resident on the accelerator (``registry``), within a byte budget
and pinned while requests use them, loaded once however many ask (``loading``), kept in host memory as a
second tier, and dropped when the store says a task changed (``invalidation``)."""
