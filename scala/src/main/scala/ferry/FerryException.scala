package ferry

/**
 * Base of every error ferry raises on purpose. Messages say what was expected, what was found
 * and how to fix it. All subclasses are serializable, so an error raised in a task reaches the
 * driver intact as the cause of Spark's job failure (see [[FerryException.find]]).
 */
class FerryException(message: String, cause: Throwable) extends RuntimeException(message, cause) {
  def this(message: String) = this(message, null)
}

object FerryException {

  /** The first [[FerryException]] in `t`'s cause chain, if any (e.g. inside a SparkException). */
  def find(t: Throwable): Option[FerryException] = {
    var cur = t
    val seen = new java.util.IdentityHashMap[Throwable, Unit]()
    while (cur != null && !seen.containsKey(cur)) {
      cur match {
        case f: FerryException => return Some(f)
        case _ =>
      }
      seen.put(cur, ())
      cur = cur.getCause
    }
    None
  }

  /** Runs `body` and rethrows a [[FerryException]] found in a failure's cause chain as itself. */
  private[ferry] def unwrapping[T](body: => T): T =
    try body
    catch {
      case e: FerryException => throw e
      case e: Exception =>
        find(e) match {
          case Some(f) =>
            f.addSuppressed(e)
            throw f
          case None => throw e
        }
    }
}

/** The worker has no stage of that name. */
class UnknownStageException(val stage: String, message: String, cause: Throwable)
  extends FerryException(message, cause) {
  def this(stage: String, message: String) = this(stage, message, null)
}

/** The params given to a stage are missing, of the wrong type or out of range. */
class InvalidParamsException(val stage: String, message: String, cause: Throwable)
  extends FerryException(message, cause) {
  def this(stage: String, message: String) = this(stage, message, null)
}

/** The input columns do not have the names or types the stage needs. */
class SchemaMismatchException(val stage: String, message: String, cause: Throwable)
  extends FerryException(message, cause) {
  def this(stage: String, message: String) = this(stage, message, null)
}

/** The data itself is unusable: nulls, ids that are not a dense range, input changed between passes. */
class InvalidInputException(val stage: String, message: String, cause: Throwable)
  extends FerryException(message, cause) {
  def this(stage: String, message: String) = this(stage, message, null)
}

/**
 * A Python stage raised. Carries the stage, the Python exception's type, its message and the
 * Python traceback; the traceback is part of [[getMessage]] too.
 */
class PythonStageException(
    val stage: String,
    val pythonType: String,
    val pythonMessage: String,
    val pythonTraceback: String,
    message: String,
    cause: Throwable)
  extends FerryException(message, cause)

/**
 * No worker could serve the call: it could not be started, it died, or the connection broke.
 * A different failure from a stage that raised ([[PythonStageException]]); retrying on a fresh
 * worker may succeed.
 */
class WorkerUnavailableException(message: String, cause: Throwable) extends FerryException(message, cause) {
  def this(message: String) = this(message, null)
}

/** The worker refused the bearer token (missing or wrong). */
class AuthenticationException(message: String, cause: Throwable) extends FerryException(message, cause) {
  def this(message: String) = this(message, null)
}

/** A Run referenced a resource digest the worker never received. */
class MissingResourceException(val stage: String, message: String, cause: Throwable)
  extends FerryException(message, cause)

/** The client and the worker disagree on the protocol (a bug on one side, or mismatched versions). */
class ProtocolException(message: String, cause: Throwable) extends FerryException(message, cause) {
  def this(message: String) = this(message, null)
}
