"""Job kinds the dispatcher runs (written in the transaction of the change that needs them)."""

JOB_BUILD = "build"  # build an image (a Ray task)
JOB_APPLY = "apply"  # apply the whole desired Serve config
