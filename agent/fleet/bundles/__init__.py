"""Signed update bundles: one file of config, device profiles and models, verified and installed atomically.

``manifest``: the signed list of files (DSSE, scope ``bundle``); ``tarball``: the file format;
``reader``: one verifying pass; ``store``: the installed bundles and the staged apply
(stage, switch, commit, rollback, recover). docs/fleet.md, "Update bundles".
"""
