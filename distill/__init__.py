"""1.x-Distill for deployment: distill-1x trains a 2-step student of an SD3 teacher with its skipped block range and
compensation MLPs together; fit-compensation fits only the compensation of a frozen student for another range.
docs/distill-1x.md is the user's page; docs/distill.md defines the program the student runs."""
