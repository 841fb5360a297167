"""Teacher signals: the protocol (teachers/base.py) and its implementations, one module each."""

from distilflow.teachers.base import TeacherSignals
from distilflow.teachers.live import LiveTeacher

__all__ = ["LiveTeacher", "TeacherSignals"]
