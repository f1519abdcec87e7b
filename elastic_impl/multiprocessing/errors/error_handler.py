"""ErrorHandler: writes the structured error file a worker leaves for its agent."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import time
import traceback
import warnings
from typing import Any

logger = logging.getLogger(__name__)

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


class ErrorHandler:
    """Reads ``TORCHELASTIC_ERROR_FILE`` and writes exceptions there in upstream's JSON layout."""

    def _get_error_file_path(self) -> str | None:
        return os.environ.get(ERROR_FILE_ENV, None)

    def initialize(self) -> None:
        # Native crashes cannot be caught in Python; faulthandler at least leaves a stack in the error file.
        try:
            faulthandler.enable(all_threads=True)
        except Exception as e:
            warnings.warn(f"could not enable faulthandler: {e}", stacklevel=2)

    def _write_error_file(self, file_path: str, error_msg: str) -> None:
        try:
            parent = os.path.dirname(file_path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            tmp = f"{file_path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(error_msg)
            os.replace(tmp, file_path)  # readers never see half a file
        except Exception as e:
            warnings.warn(f"could not write error file {file_path}: {e}", stacklevel=2)

    def record_exception(self, e: BaseException) -> None:
        file = self._get_error_file_path()
        if file:
            data = {
                "message": {
                    "message": f"{type(e).__name__}: {e}",
                    "extraInfo": {
                        "py_callstack": "".join(traceback.format_exception(type(e), e, e.__traceback__)),
                        "timestamp": str(int(time.time())),
                    },
                }
            }
            self._write_error_file(file, json.dumps(data))

    def override_error_code_in_rootcause_data(
        self, rootcause_error_file: str, rootcause_error: dict[str, Any], error_code: int = 0
    ) -> None:
        if "message" not in rootcause_error:
            logger.warning("child error file (%s) has no 'message' field: %s", rootcause_error_file, rootcause_error)
        elif isinstance(rootcause_error["message"], str):
            logger.warning("child error file (%s) has a new message format; skipping error code override",
                           rootcause_error_file)
        elif isinstance(rootcause_error["message"], dict):
            # the child's process exit code is what the agent saw, so it replaces any code the child recorded
            rootcause_error["message"]["errorCode"] = error_code

    def dump_error_file(self, rootcause_error_file: str, error_code: int = 0) -> None:
        """Copy a child's error file into ours so the root cause travels up one more level."""
        try:
            with open(rootcause_error_file) as fp:
                rootcause_error = json.load(fp)
        except (OSError, ValueError) as e:
            # raised here it would replace the child's failure the caller is propagating
            logger.warning("child error file %s is not readable JSON (%s); not copied", rootcause_error_file, e)
            return
        if error_code and isinstance(rootcause_error, dict):
            self.override_error_code_in_rootcause_data(rootcause_error_file, rootcause_error, error_code)
        my_error_file = self._get_error_file_path()
        if my_error_file:
            if os.path.isfile(my_error_file):
                logger.warning("error file %s already exists; overwriting it with the child's", my_error_file)
            self._write_error_file(my_error_file, json.dumps(rootcause_error))
        else:
            logger.error("no error file set; child error: %s", json.dumps(rootcause_error))

    # Kept for API parity; copying is what dump_error_file does.
    _copy = staticmethod(shutil.copyfile)
