"""A worked example of a lab's own device for physfarm (see docs/devices.md).

Put the folder that holds this package (examples/) on PYTHONPATH, then use the system kind
"mylab.devices:Spectrometer" in any physfarm config.
"""
