"""Helpers of the JointRegSeg Slicer module that need neither Slicer nor torch (testable with plain Python).

`process`: the background worker process (launch, JSON events, process-tree cancel);
`runstate`: the module's run state machine and progress texts;
`environment`: where the library is, the worker command, method descriptions, requirements.
"""
