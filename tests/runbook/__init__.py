"""What the runbook test (tests/test_runbook.py) runs docs/operations.md against.

The runbook's commands act on a whole machine: ``/etc/clubsnap``, ``/var/lib/club``,
systemd, cron, Docker and club's server. The test gives them one without touching the
host: a private mount namespace over an overlay of ``/`` (``sandbox``), in which club is
a stand-in server (``club``: the real schema check, a real writer process, the health
endpoint) and ``systemctl``, ``journalctl`` and ``docker`` are small emulations
(``shims``) that run what the unit files and the ``docker run`` lines say, with the
mounts they ask for. ``hooks`` are the events the runbook reacts to (a bad day in April,
a lost package, a failed upgrade) and the checks that the reaction worked.
"""
