"""Small stpipe steps, written as a third party writes them (jwst's Step base), for the
adapter tests: one reads a reference through ``get_reference_file``, one crashes."""

import logging

from jwst.stpipe import Step

log = logging.getLogger(__name__)


class RecordGain(Step):
    """Logs the gain reference stpipe hands it and the integrations it was given."""

    class_alias = "record_gain"
    reference_file_types = ["gain"]
    spec = """
        label = string(default="gain") # what to call it in the log
    """

    def process(self, model):
        path = self.get_reference_file(model, "gain")
        log.warning("%s reference %s, integrations %s-%s of %s, data %s", self.label, path,
                    model.meta.exposure.integration_start, model.meta.exposure.integration_end,
                    model.meta.exposure.nints, model.data.shape)
        model.meta.cal_step.record_gain = "COMPLETE"
        return model


class Crash(Step):
    class_alias = "crash"

    def process(self, model):
        raise RuntimeError("boom in the third-party step")


class NotAStep:
    pass
