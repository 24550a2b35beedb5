"""Webhooks: where a delivery may go (addresses), how it is signed (signing, Standard Webhooks)
and how one attempt is made (sender). What is due and each delivery's outcome live in Redis
(service.jobs.webhook_schedule); the loop that sends them is worker.dispatcher."""
