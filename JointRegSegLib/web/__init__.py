"""`jointregseg web`: the Slicer module's panels in a browser, over the same controller, on real Slicer views.

Modules: `files` (what the page may read and write), `views` (overlay choices, legends, orientation
labels), `panels` (the page's layout), `server` (the scene, the controller and the page's state and
handlers). Needs the ``[web]`` extra (trame-slicer with slicer-core); importing this package alone
loads none of it.
"""
