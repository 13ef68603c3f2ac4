from envmgr.face.cli import entry

entry()
