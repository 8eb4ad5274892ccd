"""Scanning: everything between a body and its verdict.

Modules, from the bottom up (each imports only those above it):

* ``engine``: the :class:`~gateway.scanning.engine.Engine` interface, its
  errors, ``RulesError`` and the externals every ruleset is compiled with;
* ``yara_engine`` (yara-python, in threads) and ``yarax`` (YARA-X, in worker
  processes): the two engines;
* ``discovery``: which files of a rules directory are rules, their version
  hash and the stat snapshot the reload poller compares;
* ``snapshot``: the last good ruleset kept for worker restarts;
* ``cache``: the verdict cache; ``decoding``: Content-Encoding within limits;
  ``spool``: bodies in memory or in temporary files; ``filetypes``: sniffing;
* ``rules``: the one compile path (``compile_directory``) and the
  ``RulesManager`` (first load, reload, last-good fallback);
* ``handoff``: the scanning threads, the completion queue that hands
  verdicts to the reactor in batches, and ``InlineScans``, which keeps the
  scans cheaper than that round trip on the reactor thread;
* ``scanner``: ``YaraScanner``, the ``gateway.interfaces.Scanner`` the
  protocol calls;
* ``commands``: ``icap-gateway rules check|bench|compare``.
"""
