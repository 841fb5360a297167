"""All cases of the bad-input corpus, by what is bad."""

from . import caches, configs, data_files, generate, models, predict, security, text_files, torchrun

CASES = [
    *configs.CASES,
    *data_files.CASES,
    *text_files.CASES,
    *models.CASES,
    *caches.CASES,
    *generate.CASES,
    *predict.CASES,
    *torchrun.CASES,
    *security.CASES,
]
