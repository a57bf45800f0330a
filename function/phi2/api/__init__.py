"""The APIs: the native `/generate` API, the OpenAI API (`phi2.api.openai`), their schemas, errors and streamed
forms. Turns requests into engine calls and results into responses; the Lambda runtime (`phi2.runtime`) calls it."""
