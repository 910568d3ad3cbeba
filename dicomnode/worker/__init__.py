"""Above the stages: a leased job -> volume -> model (warm) -> typed result -> encoded,
checked objects -> the outbox. In-process today; the same steps serve remote workers."""
